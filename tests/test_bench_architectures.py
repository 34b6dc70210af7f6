"""moekit.bench.architectures: its decode prompts are encoded with each run's own tokenizer."""

from moekit.bench.architectures import run_prompts
from moekit.data import ByteTokenizer, load_corpus
from moekit.train.trainer import make_tokenizer


def test_prompts_use_the_runs_tokenizer():
    texts = [load_corpus("validation", d)[0].text for d in ("python", "english", "german")]
    byte = run_prompts("byte")
    assert byte == [ByteTokenizer().encode(t)[:48] for t in texts]
    bpe = run_prompts("bpe")
    assert bpe == [make_tokenizer("bpe").encode(t)[:48] for t in texts]
    # a BPE run must not be fed byte ids: the BPE prompts cover more text and use ids above the byte range
    assert all(len(p) == 48 for p in bpe) and bpe != byte and max(max(p) for p in bpe) > 255
