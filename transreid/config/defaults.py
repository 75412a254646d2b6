"""Every configuration key of transreid/ with its default. Experiment ymls override only what differs;
`KEY VALUE` pairs after the flags override anything on the command line.

The key names are TransReID's, so its published yml files read unchanged. Keys TransReID has but this
package does not implement (center loss, cosine layers, re-ranking, view embeddings) are accepted only at
their "off" value: a config that turns them on is refused instead of silently running something else.
"""
from yacs.config import CfgNode as CN

_C = CN()

_C.MODEL = CN()
_C.MODEL.DEVICE = "cuda"  # 'cuda' (falls back to the CPU with a note when CUDA is absent) or 'cpu'
_C.MODEL.DEVICE_ID = "0"  # GPU numbers, e.g. '0' or '0,1' (one process uses the first; torchrun: one each)
_C.MODEL.NAME = "transformer"  # the only model family here
_C.MODEL.LAST_STRIDE = 1  # CNN-backbone key of TransReID; unused by the ViT
_C.MODEL.PRETRAIN_PATH = ""  # ImageNet ViT file with timm key names (.pth/.npz-free: a torch state dict)
_C.MODEL.PRETRAIN_CHOICE = "imagenet"  # 'imagenet': load PRETRAIN_PATH into the backbone; 'self': a
#                                        TransReID checkpoint; 'none': random initialisation
_C.MODEL.NECK = "bnneck"  # BatchNorm neck before the classifiers (the only choice)
_C.MODEL.IF_WITH_CENTER = "no"  # center loss: not implemented, must stay 'no'
_C.MODEL.ID_LOSS_TYPE = "softmax"  # identity loss: cross-entropy (the only choice)
_C.MODEL.ID_LOSS_WEIGHT = 1.0
_C.MODEL.TRIPLET_LOSS_WEIGHT = 1.0
_C.MODEL.METRIC_LOSS_TYPE = "triplet"  # hard-mined triplet loss (the only choice)
_C.MODEL.DIST_TRAIN = False  # True under torchrun: one process per GPU (Gloo on the CPU)
_C.MODEL.NO_MARGIN = False  # True: soft-margin triplet log(1 + exp(d_ap - d_an)); False: margin SOLVER.MARGIN
_C.MODEL.IF_LABELSMOOTH = "on"  # label smoothing 0.1 in the identity loss ('on' / 'off')
_C.MODEL.COS_LAYER = False  # cosine classifier: not implemented, must stay False
_C.MODEL.DROP_PATH = 0.1  # stochastic depth rate of the last block (linearly less in earlier blocks)
_C.MODEL.DROP_OUT = 0.0  # dropout after the position embedding and in the MLPs
_C.MODEL.ATT_DROP_RATE = 0.0  # dropout on the attention maps
_C.MODEL.TRANSFORMER_TYPE = "vit_base_patch16_224_TransReID"  # vit_base_/vit_small_patch16_224_TransReID,
#                                                              vit_tiny_TransReID (a CPU-sized test model)
_C.MODEL.STRIDE_SIZE = [16, 16]  # patch-embedding stride (height, width); < 16 overlaps the patches
_C.MODEL.JPM = False  # jigsaw patch module: 4 local features from a shuffled copy of the last block
_C.MODEL.SHIFT_NUM = 5  # JPM shift: tokens SHIFT_NUM.. first, then 1..SHIFT_NUM-1
_C.MODEL.SHUFFLE_GROUP = 2  # JPM shuffle groups
_C.MODEL.DEVIDE_LENGTH = 4  # JPM local groups (TransReID's spelling)
_C.MODEL.RE_ARRANGE = True  # JPM: shift and shuffle before cutting into groups
_C.MODEL.SIE_COE = 3.0  # weight of the side-information (camera) embedding
_C.MODEL.SIE_CAMERA = False  # add a learned per-camera embedding to every token
_C.MODEL.SIE_VIEW = False  # view embedding: not implemented, must stay False

_C.INPUT = CN()
_C.INPUT.SIZE_TRAIN = [256, 128]  # (height, width)
_C.INPUT.SIZE_TEST = [256, 128]
_C.INPUT.PROB = 0.5  # horizontal flip probability
_C.INPUT.RE_PROB = 0.5  # random erasing probability
_C.INPUT.PIXEL_MEAN = [0.485, 0.456, 0.406]
_C.INPUT.PIXEL_STD = [0.229, 0.224, 0.225]
_C.INPUT.PADDING = 10  # pixels of zero padding before the random crop

_C.DATASETS = CN()
_C.DATASETS.NAMES = "market1501"  # 'market1501' (ROOT_DIR/market1501) or 'occ_duke' (ROOT_DIR/Occluded_Duke)
_C.DATASETS.ROOT_DIR = "../data"  # folder that holds the dataset folders above

_C.DATALOADER = CN()
_C.DATALOADER.NUM_WORKERS = 8
_C.DATALOADER.SAMPLER = "softmax_triplet"  # identity-balanced batches (the only choice)
_C.DATALOADER.NUM_INSTANCE = 4  # images per identity in a batch

_C.SOLVER = CN()
_C.SOLVER.OPTIMIZER_NAME = "SGD"  # 'SGD' (momentum SOLVER.MOMENTUM) or 'AdamW'
_C.SOLVER.MAX_EPOCHS = 120
_C.SOLVER.BASE_LR = 0.008
_C.SOLVER.LARGE_FC_LR = False  # classifiers at 2 x BASE_LR
_C.SOLVER.MOMENTUM = 0.9
_C.SOLVER.MARGIN = 0.3  # triplet margin when MODEL.NO_MARGIN is False
_C.SOLVER.WEIGHT_DECAY = 1e-4
_C.SOLVER.WEIGHT_DECAY_BIAS = 1e-4
_C.SOLVER.BIAS_LR_FACTOR = 2  # biases at BIAS_LR_FACTOR x BASE_LR
_C.SOLVER.SEED = 1234
_C.SOLVER.WARMUP_EPOCHS = 5  # linear warm-up from 0.01 x BASE_LR, then cosine down to 0.002 x BASE_LR
_C.SOLVER.WARMUP_METHOD = "linear"
_C.SOLVER.CHECKPOINT_PERIOD = 120  # write transformer_<epoch>.pth every this many epochs (and the last)
_C.SOLVER.LOG_PERIOD = 50  # steps between progress-bar loss updates
_C.SOLVER.EVAL_PERIOD = 120  # evaluate on query/gallery every this many epochs (and after the last)
_C.SOLVER.IMS_PER_BATCH = 64  # the GLOBAL batch: under torchrun each of N processes takes IMS_PER_BATCH / N

_C.TEST = CN()
_C.TEST.IMS_PER_BATCH = 128
_C.TEST.RE_RANKING = False  # transreid.test: k-reciprocal re-ranking with TransReID's k1 50, k2 15, lambda 0.3
_C.TEST.WEIGHT = ""  # checkpoint that transreid.test evaluates
_C.TEST.NECK_FEAT = "before"  # 'before': features before the BNNeck (TransReID's test setting); 'after'
_C.TEST.FEAT_NORM = "yes"  # 'yes': L2-normalise features before the Euclidean distance
_C.TEST.EVAL = True  # TransReID key; transreid.test always evaluates

# AMG pruning (transreid.finetune)
_C.FINETUNE = CN()
_C.FINETUNE.PRETRAIN_PATH = ""  # the trained (or already pruned) TransReID checkpoint to prune
_C.FINETUNE.PRUNE_MODE = "attn"  # 'attn' tokens | 'head_entropy' heads | 'head' given head ranks | 'random' heads
_C.FINETUNE.PRUNE_RATE = 0.25  # fraction of all (layer, patch) slots or of all heads to remove
_C.FINETUNE.ITER_NUM = 1  # scoring + pruning rounds; the removal is split evenly over them
_C.FINETUNE.FINE_NUM = 1  # fine-tuning epochs after each round
_C.FINETUNE.FINAL_NUM = 10  # fine-tuning epochs after the last round (evaluated every SOLVER.EVAL_PERIOD)
_C.FINETUNE.DISTILL_TYPE = "soft"  # 'soft' (KL on all logits), 'hard' (CE on the teacher's argmax), 'none'
_C.FINETUNE.DISTILL_ALPHA = 1.0
_C.FINETUNE.DISTILL_TAU = 1.0
_C.FINETUNE.HEAD_RANK = []  # PRUNE_MODE 'head': one score per head of each prunable layer, [[...], ...];
#                             the highest scores are removed first, like entropies

_C.OUTPUT_DIR = "./logs/transreid"  # run folder: checkpoints, log.txt, config.yaml
