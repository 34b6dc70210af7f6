"""moekit stand-in for transformers' tests/utils/test_configuration_utils.py (placed by fetch_tests.py only when the
real file is missing): test_configuration_common.py imports `config_common_kwargs` from it. The values are those of
the transformers v5 file; the rest of that file (hub push tests) is not needed for model tests."""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
