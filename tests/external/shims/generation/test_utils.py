"""moekit stand-in for transformers' tests/generation/test_utils.py (placed by fetch_tests.py only when the real
file is missing). It defines the mixin that test_modeling_common.py imports, with no tests: the generation tests
do not run. Replace it with the real file (`fetch_tests.py --from-dir CHECKOUT`) to run them."""


class GenerationTesterMixin:
    model_tester = None
    all_generative_model_classes = ()
    input_name = "input_ids"
    max_new_tokens = 3
