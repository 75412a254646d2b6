"""Build MSMT17_V1's pytorch/ folder from its list files (list_train -> train, list_val -> val, both -> train_all).

    python prepare_msmt.py                        # ./datasets/MSMT17_V1
"""
from toolkit.layouts import prepare_main

if __name__ == "__main__":
    prepare_main("msmt", "./datasets/MSMT17_V1", __doc__.splitlines()[0])
