"""The networks a method is built from: timm backbones with their multi-crop forward, projection and
DINO heads, and the EMA copies teachers are made of. Reads only ``sslbench.base``."""
