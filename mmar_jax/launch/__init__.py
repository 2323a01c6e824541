"""Launchers for TPU pods and GPU clusters: validated arguments in, shell commands out."""
