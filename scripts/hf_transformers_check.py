#!/usr/bin/env python3
"""What `transformers` itself says about a folder, without PyTorch (tests/hf_workflow.rs).

usage:
  hf_transformers_check.py tokenize FOLDER TEXT    prints JSON: the ids AutoTokenizer gives TEXT
                                                   (no special tokens), its bos/eos ids, and
                                                   AutoConfig's eos_token_id where there is a config
  hf_transformers_check.py config KIND OUT ...     writes OUT/config.json with the transformers
                                                   configuration class of KIND (qwen3, llama,
                                                   qwen3_moe, gpt2) and the given key=value sizes,
                                                   as save_pretrained writes it; prints its version
"""
import json
import os
import sys

import transformers


def main():
    if sys.argv[1] == "tokenize":
        tok = transformers.AutoTokenizer.from_pretrained(sys.argv[2])
        ids = tok(sys.argv[3], add_special_tokens=False)["input_ids"]
        has_config = os.path.exists(os.path.join(sys.argv[2], "config.json"))
        config_eos = transformers.AutoConfig.from_pretrained(sys.argv[2]).eos_token_id if has_config else None
        print(json.dumps({"ids": ids, "bos": tok.bos_token_id, "eos": tok.eos_token_id, "config_eos": config_eos}))
    elif sys.argv[1] == "config":
        kind, out = sys.argv[2], sys.argv[3]
        kw = {}
        for kv in sys.argv[4:]:
            k, v = kv.split("=", 1)
            kw[k] = json.loads(v)
        cls = transformers.AutoConfig.for_model(kind).__class__
        cls(**kw).save_pretrained(out)
        print(transformers.__version__)
    else:
        sys.exit(__doc__)


main()
