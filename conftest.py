"""Root conftest: registers the convergence test's hypothesis profiles before the hypothesis
plugin resolves `--hypothesis-profile` (it does so at configure time, before any test module is
imported), so `pytest tests/test_convergence.py --hypothesis-profile=soak` (make soak) works."""

import tests.convergence_model  # noqa: F401 - registers the `convergence` and `soak` profiles
