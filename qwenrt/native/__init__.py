"""qwenrt's builds of native engine packages: its patches to them, and the scripts that apply them."""
