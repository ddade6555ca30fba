"""cellfm: channel-adaptive self-supervised encoders for multichannel microscopy, on Ray."""
__version__ = "0.1.0"
