"""Accuracy protocols on public face datasets: `python -m jfacerec.benchmarks.lfw`, `.orl`."""
