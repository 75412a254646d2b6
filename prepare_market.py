"""Build Market-1501's pytorch/ folder (train, val, train_all, query, gallery, multi-query).

    python prepare_market.py                      # ./datasets/Market
    python prepare_market.py --data_dir /data/Market-1501-v15.09.15 --copy
"""
from toolkit.layouts import prepare_main

if __name__ == "__main__":
    prepare_main("market", "./datasets/Market", __doc__.splitlines()[0])
