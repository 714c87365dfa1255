"""What runs the book, not the models: profiles, where figures and metrics go, running and publishing the
chapters (chapters.py, edition.py), the machine check (doctor.py), notebook execution (notebook_run.py) and
`make stress` (stress.py).

Imports flow one way: `book` may import `refimpl` and `kernels`; neither imports `book`
(tests/test_imports.py). The notebooks `import book` for the helpers they call:

    PROFILE = book.check_profile(PROFILE)          # "ci" | "small" | "gpu"
    DEVICE = book.device_for_profile(PROFILE)      # "cuda" for "gpu" (refused without one), else "cpu"
    book.save_figure(fig, "00_overview", "loss")   # figures/00_overview/loss.png (atomically)
    book.write_metrics("00_overview", {...}, PROFILE)
"""

from book.chapters import (PROFILES, ROOT, chapters, check_profile, device_for_profile, figures_dir, output_root,
                           profile, read_metrics, reproducible_part, save_figure, write_metrics)

__all__ = ["PROFILES", "ROOT", "chapters", "check_profile", "device_for_profile", "figures_dir", "output_root",
           "profile", "read_metrics", "reproducible_part", "save_figure", "write_metrics"]
