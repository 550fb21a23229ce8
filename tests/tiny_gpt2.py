"""The small random-weight GPT-2 the decoder tests compare against transformers' generate() with
(built from a config, nothing downloaded). Import after pytest.importorskip("transformers")."""

import torch

EOS = 3      # also BOS and the pad id
VOCAB = 48


def tiny_gpt2(seed, vocab=VOCAB):
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # make EOS likely enough that hypotheses finish early
        model.transformer.wte.weight[EOS] *= 4
    return model
