"""TransReID vision transformers for re-ID and their AMG token/head pruning; run from the repository root:

    python -m transreid.train    --config_file transreid/configs/Market/vit_transreid_stride.yml
    python -m transreid.test     --config_file ... TEST.WEIGHT ./logs/.../transformer_120.pth
    python -m transreid.finetune --config_file transreid/configs/Market/vit_transreid_stride_attn.yml
"""
