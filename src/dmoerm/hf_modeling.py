"""DMoERM as a Hugging Face model: ``AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True)``.

``dmoerm export`` copies this file into an exported DMoERM folder as ``modeling_dmoerm.py`` (``auto_map`` in the
folder's ``config.json`` names its two classes). The folder holds the DMoERM itself in a subfolder (``dmoerm/``,
with its backbone in ``dmoerm/backbone/``) and the tokenizer at the top. The classes import the installed
``dmoerm`` package and score through :meth:`dmoerm.model.DMoERM.score_inputs`, the one scoring path of the
library, so any change to routing or aggregation there is inherited.

Routing is done from the tokens alone: in each row, the response starts after the last occurrence of the chat
template's assistant header (``config.assistant_header_ids``, measured at export time), as ArmoRM finds its gating
token. Everything up to and including that header is the prompt the router reads.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

logger = logging.getLogger(__name__)


class DMoERMConfig(PretrainedConfig):
    """Configuration of an exported DMoERM: where its dmoerm folder is and how to find the response start."""

    model_type = "dmoerm"

    def __init__(
        self,
        dmoerm_subfolder: str = "dmoerm",
        assistant_header_ids: list[int] | None = None,
        scoring_batch_size: int = 16,
        categories: list[str] | None = None,
        **kwargs,
    ):
        kwargs.setdefault("num_labels", 1)
        # "regression": transformers' text-classification pipeline and vLLM's classify pooler then return the
        # raw reward (no sigmoid).
        kwargs.setdefault("problem_type", "regression")
        super().__init__(**kwargs)
        self.dmoerm_subfolder = dmoerm_subfolder
        """The DMoERM model directory, relative to the exported folder."""
        self.assistant_header_ids = list(assistant_header_ids or [])
        """Token ids of the chat template's assistant header; the response starts after their last occurrence."""
        self.scoring_batch_size = scoring_batch_size
        """Rows per trunk pass inside ``DMoERM.score_inputs``."""
        self.categories = list(categories or [])
        """The router's categories, in order (information only)."""


@dataclass
class DMoERMRewardOutput(SequenceClassifierOutput):
    """``logits`` [B, 1] are the rewards; the routing of each row comes along."""

    category_index: torch.LongTensor | None = None
    """[B] index into ``config.categories`` of the category whose inner model scored each row."""
    category_probability: torch.FloatTensor | None = None
    """[B] the router's probability of that category."""


def last_occurrence(tokens: list[int], pattern: list[int]) -> int:
    """Start index of the last occurrence of ``pattern`` in ``tokens``; -1 when absent."""
    n = len(pattern)
    for start in range(len(tokens) - n, -1, -1):
        if tokens[start : start + n] == pattern:
            return start
    return -1


def truncate(tokens: list[int], prompt_length: int, max_length: int) -> tuple[list[int], int]:
    """``dmoerm.encoding.encode``'s truncation on token ids (``dmoerm.encoding.cut``): the prompt keeps its
    window, the response its end (where the reward is read)."""
    from dmoerm.encoding import cut

    e = cut(tokens[:prompt_length], tokens[prompt_length:], max_length)
    return list(e.input_ids), e.prompt_length


def encoded_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, header: list[int], max_length: int | None = None
) -> list:
    """Rows of input_ids [B, T] (left or right padded; attention_mask [B, T] 1 on real tokens) -> dmoerm inputs.

    The prompt of a row ends with the last occurrence of the assistant header, as in ``dmoerm.encoding.encode``
    (whose prompt is the conversation rendered with the generation prompt); rows are cut as ``encode`` cuts
    them (the prompt's window, the response's end).
    """
    from dmoerm.encoding import EncodedInput

    if not header:
        raise ValueError("config.assistant_header_ids is empty: re-export the model with `dmoerm export`")
    out = []
    for row, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
        tokens = [t for t, m in zip(ids, mask) if m]
        start = last_occurrence(tokens, header)
        if start < 0:
            raise ValueError(
                f"row {row}: the assistant header (token ids {header}) is not in the input; render the chat with "
                "the tokenizer's chat template (prompt messages + the assistant response) before tokenizing"
            )
        prompt_length = start + len(header)
        if max_length is not None:  # encode cuts every row the same way, long or not
            tokens, prompt_length = truncate(tokens, prompt_length, max_length)
        out.append(EncodedInput(tuple(tokens), prompt_length))
    return out


def _stage(folder: Path, config: dict, tmp: Path) -> None:
    # A view of `folder` whose backbone_config.json names the bundled backbone by absolute path, so the exported
    # folder can be moved or downloaded anywhere; the files themselves are linked, not copied.
    for entry in folder.iterdir():
        if entry.name == "backbone_config.json":
            continue
        try:
            os.symlink(entry.resolve(), tmp / entry.name)
        except OSError:  # no symlinks on this file system
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, tmp / entry.name)
    (tmp / "backbone_config.json").write_text(json.dumps(config, indent=2))


def load_dmoerm(folder: str | os.PathLike):
    """``DMoERM.from_pretrained`` of an exported subfolder whose backbone is given relative to it."""
    from dmoerm.model import DMoERM

    folder = Path(folder)
    config = json.loads((folder / "backbone_config.json").read_text())
    backbone = str(config.get("backbone") or "")
    if not backbone or Path(backbone).is_absolute() or not (folder / backbone).is_dir():
        return DMoERM.from_pretrained(folder)
    config["backbone"] = str((folder / backbone).resolve())
    with tempfile.TemporaryDirectory(prefix="dmoerm-hf-") as tmp:
        _stage(folder, config, Path(tmp))
        return DMoERM.from_pretrained(tmp)  # every weight is read into memory before the view is removed


def _local_folder(name_or_path: str | os.PathLike, kwargs: dict) -> Path:
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            str(name_or_path),
            revision=kwargs.get("revision"),
            cache_dir=kwargs.get("cache_dir"),
            local_files_only=bool(kwargs.get("local_files_only", False)),
            token=kwargs.get("token"),
        )
    )


def _device(device_map) -> torch.device | None:
    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    if isinstance(device_map, (str, int, torch.device)) and device_map != "auto":
        return torch.device(device_map)
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return None


class DMoERMForSequenceClassification(PreTrainedModel):
    """A DMoERM behind the ``*ForSequenceClassification`` interface: ``model(input_ids, attention_mask).logits``
    [B, 1] are ``DMoERM.score``'s rewards. Scoring only: the DMoERM stays frozen and in eval mode."""

    config_class = DMoERMConfig
    base_model_prefix = "dmoerm"
    main_input_name = "input_ids"

    def __init__(self, config: DMoERMConfig, dmoerm=None):
        super().__init__(config)
        self.post_init()
        self.dmoerm = (
            dmoerm  # attached after post_init: its weights are trained already, never re-initialised
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """Load the exported folder (a local path or a hub id); the DMoERM comes from its subfolder.

        Loading options of plain models (dtype, quantization) do not apply: the DMoERM keeps the dtypes it was
        trained with. ``device_map`` as one device (or ``"auto"``) moves it there.
        """
        folder = _local_folder(pretrained_model_name_or_path, kwargs)
        if config is None:
            config = cls.config_class.from_pretrained(folder)
        ignored = sorted(
            k for k in ("dtype", "torch_dtype", "quantization_config", "load_in_8bit") if kwargs.get(k)
        )
        if ignored:
            logger.info("DMoERM keeps its trained dtypes; ignoring %s", ", ".join(ignored))
        model = cls(config, load_dmoerm(folder / config.dmoerm_subfolder))
        device = _device(kwargs.get("device_map"))
        if device is not None:
            model.to(device)
        return model.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.dmoerm is not None:
            self.dmoerm.eval()  # PEFT's mixed-adapter batches (all experts at once) run in eval mode only
        return self

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DMoERMRewardOutput:
        """input_ids, attention_mask [B, T] -> logits [B, 1] (float32), the rewards of DMoERM.score."""
        if input_ids is None:
            raise ValueError(
                "DMoERM routes from the tokens: pass input_ids (inputs_embeds are not supported)"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = encoded_inputs(
            input_ids, attention_mask, self.config.assistant_header_ids, self.dmoerm.max_length
        )
        outputs = self.dmoerm.score_inputs(inputs, batch_size=self.config.scoring_batch_size)
        device = input_ids.device
        categories = self.dmoerm.categories
        return DMoERMRewardOutput(
            logits=torch.tensor([[o.reward] for o in outputs], dtype=torch.float32, device=device),  # [B, 1]
            category_index=torch.tensor([categories.index(o.category) for o in outputs], device=device),
            category_probability=torch.tensor(
                [o.category_probability for o in outputs], dtype=torch.float32, device=device
            ),
        )
