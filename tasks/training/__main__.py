"""`python -m tasks.training matcher|uunet ...`: the standalone entry point of the training loops."""
from tasks.training.loops import main

main()
