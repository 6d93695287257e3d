"""Side-by-side benchmarks of nbdserve against qemu-nbd and nbdkit (``python3 -m bench``)."""
