"""`pretrain adapt`: few-shot adaptation of a trained checkpoint (linear probe, CoOp, PRE, LoRA, GLAD) on
eval sets in clip_benchmark's layout; docs/adaptation.md."""
