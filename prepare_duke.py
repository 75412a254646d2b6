"""Build DukeMTMC-reID's pytorch/ folder (train, val, train_all, query, gallery).

    python prepare_duke.py                        # ./datasets/DukeMTMC-reID
"""
from toolkit.layouts import prepare_main

if __name__ == "__main__":
    prepare_main("duke", "./datasets/DukeMTMC-reID", __doc__.splitlines()[0])
