"""Bridges to other libraries. ``selfattn.integrations.transformers`` plugs selfattn into Hugging
Face transformers (``attn_implementation="selfattn"``); it imports transformers only when used."""
