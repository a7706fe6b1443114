"""mtlora core: adapter math (mtlora, hydralora, lora), checkpoint formats, base-model loading, reference forward.

Importing this package is cheap: it imports torch only through the submodules that need it, so that light
users (the eval client, the CLI's --help) do not pay for torch.
"""

__version__ = "0.1.0"
