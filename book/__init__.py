"""What runs the book (not the models): notebook execution for now; the rest of the plumbing moves here
from refimpl/ (issue 17). Imports flow one way: `book` may import `refimpl` and `kernels`, never the reverse."""
