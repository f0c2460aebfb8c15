import os

# Arrow's default pool (mimalloc) hands freed memory back to the OS eagerly, and every batch
# of a data stage then touches fresh pages again: on the 2-core VM the bench runs on, the
# 1M-row validate, clean and split spent 3-9 s in the kernel with it and 1-3 s with the
# system allocator, and finished 1.5-4 s sooner. Set before pyarrow is first imported, and
# inherited by the Ray workers this process starts; a user's own choice is kept.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
