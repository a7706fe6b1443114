"""mtlora-train: fine-tunes mtlora / hydralora / lora adapters on a frozen LLaMA-architecture base model.

Modules: `config` (typed TrainConfig, flag -> AdapterConfig mapping), `cli` (the `mtlora-train` command), `data`
(records, response-only labels, hashed cache), `losses` (balance and spectral terms), `recipe` (the accelerate
training loop), `state` (atomic resumable checkpoints), `params` (meta-device parameter counts).
Importing this package is cheap; torch is imported by the submodules that need it.
"""

__all__ = ["TrainConfig", "MtloraRecipe", "count_trainable_params"]


def __getattr__(name: str):
    if name == "TrainConfig":
        from mtlora_train.config import TrainConfig

        return TrainConfig
    if name == "MtloraRecipe":
        from mtlora_train.recipe import MtloraRecipe

        return MtloraRecipe
    if name == "count_trainable_params":
        from mtlora_train.params import count_trainable_params

        return count_trainable_params
    raise AttributeError(name)
