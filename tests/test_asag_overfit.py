"""The multi-stage sparse detector learns: it overfits a handful of real scene images to a high COCO AP."""
import time

import torch

from distill.data import DetectionTransform, collate, generate_scenes, load_dataset
from distill.engine.evaluate import evaluate_detector
from students import create_student


def test_sparse_rcnn6_overfits_scene_images(tmp_path):
    generate_scenes(tmp_path / "scenes", num_train=4, num_val=1, size=96, seed=5, negative_fraction=0.0)
    dataset = load_dataset(tmp_path / "scenes", "train", DetectionTransform(96, hflip_prob=0.0))
    batch = collate([dataset.get(i, flip=False) for i in range(len(dataset))])
    assert sum(len(t.boxes) for t in batch.targets) == 9
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = create_student(
            "sparse_rcnn6", backbone="mobilenetv3_small_050", num_classes=len(dataset.classes), strides=(8, 16, 32),
            fpn_channels=32, num_queries=16, ffn_dim=64, dynamic_dim=8, num_heads=4, roi_canonical=48.0,
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        model.train()
        start = time.perf_counter()
        for _ in range(300):
            predictions = model.head(model.features(batch.images), batch.image_sizes)
            losses, _ = model.loss(predictions, batch.targets, batch.image_sizes)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        seconds = time.perf_counter() - start
        metrics = evaluate_detector(model, dataset, batch_size=4)  # pycocotools on the same 4 images
    finally:
        torch.set_num_threads(threads)
    # Measured: AP 0.93-0.96, AP50 1.0 after 300 steps; ~32 s of training on one CPU thread of
    # the 2-core dev machine when quiet (up to ~120 s when shared), so time is reported, not asserted.
    assert metrics["AP50"] >= 0.95, (metrics, seconds)
    assert metrics["AP"] >= 0.8, (metrics, seconds)
