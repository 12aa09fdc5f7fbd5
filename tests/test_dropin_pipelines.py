"""The package's drop-in pipeline classes: same as the stock ones, plus set_attn_processor / reset_attn_processor."""
import diffusers
import pytest
import torch

import vidattn.pipelines as vp
from vidattn import DenseProcessor, RadialProcessor
from vidattn.pipelines.tiny import TINY_HUNYUAN_SETTINGS, tiny_hunyuan_pipeline


FREESWIM = {"FreeSwimPipeline": "WanPipeline", "FreeSwimLTXPipeline": "LTXPipeline"}


@pytest.mark.parametrize("name", vp.__all__)
def test_dropin_classes_subclass_the_stock_pipeline(name):
    cls = getattr(vp, name)
    stock = FREESWIM.get(name, name)  # the FreeSwim pipelines extend the drop-in of their model
    assert issubclass(cls, getattr(diffusers, stock)) and cls.__name__ == name
    assert issubclass(cls, getattr(vp, stock))
    assert callable(cls.set_attn_processor) and callable(cls.reset_attn_processor)


def test_hunyuan_dropin_set_attn_processor_round_trip():
    stock = tiny_hunyuan_pipeline(seed=0)
    pipe = vp.HunyuanVideoPipeline(**stock.components)
    settings = dict(TINY_HUNYUAN_SETTINGS, num_frames=33)
    template = {"template": "{}", "crop_start": 0}

    def run():
        return pipe("a fox", output_type="np", generator=torch.Generator().manual_seed(0),
                    prompt_template=template, **settings).frames

    ref = run()
    pipe.set_attn_processor(DenseProcessor())
    dense = run()
    pipe.reset_attn_processor()
    assert abs(dense - ref).max() == 0
    pipe.set_attn_processor(RadialProcessor(block_size=16, decimation_threshold=16))
    run()
    stats = pipe.attention_stats
    pipe.reset_attn_processor()
    assert stats["sparse_calls"] > 0 and 0 < stats["sparse_density"] < 1
    assert pipe.attention_stats is None
