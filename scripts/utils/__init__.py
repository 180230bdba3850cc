"""Layer 0, utilities: the command-line front end of every tool (``cli``), atomic file writing and image file names
(``files``), and the resumable training checkpoints with their random states (``checkpoints``). It imports nothing
from the rest of ``scripts``, so every other layer may import it."""
