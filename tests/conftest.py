"""Constants shared by the library's tests (the settings live in the repository's conftest.py)."""

DTYPES = ("float32", "bfloat16", "float16")
