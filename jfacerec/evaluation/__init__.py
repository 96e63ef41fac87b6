"""Evaluation: how well a trained model does, built on inference.

- `evaluator`: `evaluate(config, workdir)`, the closed-set, pair and open-set figures of a workdir;
- `protocols`: verification pairs and open-set splits drawn from labels, thresholds across folds;
- `plots`: ROC curves, score histograms and training curves beside the JSON;
- `lfw`, `orl`: the public-dataset protocols (`python -m jfacerec.evaluation.lfw`);
- `hw2p2`: the course's submission CSVs (`python -m jfacerec.predict`).
"""
