"""Build CUHK01's pytorch/ folder: train_all with every identity (for merged training), and an evaluation split.

    python prepare_cuhk01.py                      # ./datasets/CUHK01 (raw images in CUHK01/campus/)

Evaluation split, fixed by the sorted identity order: the first 485 of the 971 ids train (train/val),
the other 486 are tested with camera 1 (images 001-002) as query and camera 2 (003-004) as gallery.
"""
from toolkit.layouts import prepare_main

if __name__ == "__main__":
    prepare_main("cuhk01", "./datasets/CUHK01", __doc__.splitlines()[0])
