"""`qwenrt eval`: what each artifact costs in quality, measured against the float model it was made from."""
