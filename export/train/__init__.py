"""ovseg-train: PixelCLIP fine-tuning of CLIP's image encoder from unlabelled masks (SA-1B JSON or DINOv2 k-means).

data.py    images + masks -> crops, mask grids, teacher / student views
model.py   student dense CLIP, learnable class prompts, EMA teacher, ConvHead
losses.py  mask pooling, Sinkhorn clustering onto the prompts, merged targets, BCE
engine.py  the loop: AdamW, schedule, AMP, DDP, checkpoints, CSV log
outputs.py what ovseg-export takes: student_visual.safetensors, prompts.npy, prompt_names.json
"""
