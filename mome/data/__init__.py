"""mome's Lightning data modules (importing this package imports Lightning; ``import mome`` does not).

- :class:`DigitsDataModule`: the embedded default (scikit-learn's digits as captions or labels, and with
  ``task="image_text_audio"`` each digit's DTMF tone as log-mel features: :mod:`mome.data.digits_audio`);
- :class:`ImageFolderDataModule`, :class:`CsvImageTextDataModule`, :class:`WebDatasetDataModule`: real data;
- :mod:`mome.data.conversation` and :mod:`mome.data.shapes`: LLaVA-style conversations and the synthetic
  shapes VQA set of the MoE-LLaVA demo; :mod:`mome.data.digits_conversation`: the digits as image / audio
  questions (Uni-MoE's demo).
- :mod:`mome.data.questions`: each conversation's first question and its reference answer (VQA evaluation).
"""

from .base import BadSampleError, DataConfigError, MomeDataModule, ResumableDataLoader
from .conversation import ConversationDataModule, ShapesDataModule
from .digits import DIGIT_CLASSNAMES, DIGIT_TEMPLATES, DigitsAudioDataset, DigitsDataModule
from .digits_audio import DTMF_FREQUENCIES, AudioFeatures
from .digits_conversation import DigitsConversationDataModule
from .folders import CsvImageTextDataModule, ImageFolderDataModule
from .webdataset import WebDatasetDataModule

__all__ = [
    "AudioFeatures",
    "BadSampleError",
    "DIGIT_CLASSNAMES",
    "DIGIT_TEMPLATES",
    "DTMF_FREQUENCIES",
    "ConversationDataModule",
    "CsvImageTextDataModule",
    "DataConfigError",
    "DigitsAudioDataset",
    "DigitsConversationDataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "MomeDataModule",
    "ResumableDataLoader",
    "ShapesDataModule",
    "WebDatasetDataModule",
]
