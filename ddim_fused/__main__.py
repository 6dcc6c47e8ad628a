"""`python -m ddim_fused`: the ddim-fused command line."""
from .cli import main

raise SystemExit(main())
