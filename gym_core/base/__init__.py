"""The base layer every part stands on: user-facing errors, atomic files, thread counts, the C++ build."""
