"""Stages of the data flow, each usable without the CLI: files, decode, backbone, head, fine-tune."""
