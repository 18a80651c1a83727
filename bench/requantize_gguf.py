#!/usr/bin/env python3
"""Writes a GGUF's weights twice, dequantized to f32 and quantized to Q8_0: llama.cpp's side of
`marengod perplexity --reference`. `llama-perplexity --kl-divergence-base` on the f32 file, then
`--kl-divergence` on the Q8_0 file, give llama.cpp's KL divergence and top-1 agreement for Q8_0
against the same weights the marengo f32 bundle exported from that GGUF holds (no
llama-quantize needed: the `gguf` package of llama.cpp's source, bench/requirements.txt).
Matrices whose rows are whole blocks of 32 become Q8_0; the rest (norms) stay f32.

    python bench/requantize_gguf.py IN.gguf OUT-f32.gguf OUT-q8_0.gguf
"""

import argparse

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import dequantize, quantize


def write(reader: GGUFReader, path: str, quantized: bool) -> None:
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(path, arch)
    file_type = LlamaFileType.MOSTLY_Q8_0 if quantized else LlamaFileType.ALL_F32
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            writer.add_file_type(file_type)
        elif field.types[0] == GGUFValueType.ARRAY:
            writer.add_key_value(name, field.contents(), field.types[0], sub_type=field.types[-1])
        else:
            writer.add_key_value(name, field.contents(), field.types[0])
    for tensor in reader.tensors:
        shape = tuple(reversed([int(d) for d in tensor.shape]))
        data = dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(shape)
        if quantized and data.ndim == 2 and shape[-1] % 32 == 0:
            blocks = quantize(data, GGMLQuantizationType.Q8_0)
            writer.add_tensor(
                tensor.name, blocks, raw_shape=blocks.shape, raw_dtype=GGMLQuantizationType.Q8_0
            )
        else:
            writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf")
    parser.add_argument("f32_out")
    parser.add_argument("q8_0_out")
    args = parser.parse_args()
    reader = GGUFReader(args.gguf)
    write(reader, args.f32_out, quantized=False)
    write(reader, args.q8_0_out, quantized=True)


if __name__ == "__main__":
    main()
