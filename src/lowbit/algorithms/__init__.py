"""Calibration algorithms (pure maths) and the layer-by-layer driver."""
