"""ChatGLM-6B configuration (written for this toolkit; field names and meanings follow the official config.json).

The class defaults are those of the first (150528-row) checkpoint; the shipped config.json sets the slim values."""
from transformers import PretrainedConfig


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"
    attribute_map = {"num_hidden_layers": "num_layers"}

    def __init__(
        self,
        vocab_size=150528,
        hidden_size=4096,
        num_layers=28,
        num_attention_heads=32,
        layernorm_epsilon=1e-5,
        use_cache=True,
        bos_token_id=150004,
        eos_token_id=150005,
        mask_token_id=150000,
        gmask_token_id=150001,
        pad_token_id=0,
        max_sequence_length=2048,
        inner_hidden_size=16384,
        position_encoding_2d=True,
        quantization_bit=0,
        quantization_embeddings=False,
        pre_seq_len=None,
        prefix_projection=False,
        initializer_range=0.02,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.layernorm_epsilon = layernorm_epsilon
        self.use_cache = use_cache
        self.max_sequence_length = max_sequence_length
        self.inner_hidden_size = inner_hidden_size
        self.position_encoding_2d = position_encoding_2d
        self.mask_token_id = mask_token_id
        self.gmask_token_id = gmask_token_id
        self.quantization_bit = quantization_bit
        self.quantization_embeddings = quantization_embeddings
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        self.initializer_range = initializer_range
        # transformers ties lm_head to the word embeddings when loading v1 (the checkpoint key is kept but unused).
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
