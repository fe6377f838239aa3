#!/usr/bin/env python3
"""A GGUF of another type made from the shipped Q4_1 file with gguf-py (llama.cpp's own Python
package), as `llama_model_quantize` makes it: every 2-D weight dequantized to f32 and
requantized to TYPE (one already of TYPE copied), 1-D tensors (norms) kept in f32, the metadata copied with
`general.file_type` set. TYPE is Q8_0 or F16 (gguf-py quantizes these; its numpy code is the
reference of ggml's C code, and `tensor_digest` below lets a golden file record that the tensors
are byte-identical to llama.cpp's). Run by `cargo xtask setup` in runtimes/py.

Usage: derive_gguf.py IN OUT TYPE
       derive_gguf.py --digest FILE     (prints the tensor digest)
"""

import hashlib
import os
import sys

import gguf
import numpy as np

# llama.cpp's LLAMA_FTYPE_MOSTLY_* for `general.file_type`.
FILE_TYPES = {"Q8_0": 7, "F16": 1}
QTYPES = {"Q8_0": gguf.GGMLQuantizationType.Q8_0, "F16": gguf.GGMLQuantizationType.F16}


def tensor_digest(path):
    """sha256 over every tensor's name, type and data, by name: equal for two files whose
    weights are byte-identical, whatever their metadata and tensor order."""
    h = hashlib.sha256()
    for t in sorted(gguf.GGUFReader(path).tensors, key=lambda t: t.name.encode()):
        h.update(t.name.encode() + b"\0" + int(t.tensor_type).to_bytes(4, "little"))
        h.update(np.ascontiguousarray(t.data).view(np.uint8).tobytes())
    return h.hexdigest()


def derive(src, dst, kind):
    qtype = QTYPES[kind]
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = dst + ".part"
    writer = gguf.GGUFWriter(tmp, arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = FILE_TYPES[kind]
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    tensors = []
    for t in reader.tensors:
        # As llama_model_quantize: a tensor already of the target type is copied.
        if len(t.shape) >= 2 and t.tensor_type not in (gguf.GGMLQuantizationType.F32, qtype):
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            data, tt = gguf.quants.quantize(values, qtype), qtype
        else:
            data, tt = t.data, t.tensor_type
        tensors.append((t.name, data, tt))
        writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, tt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data, _ in tensors:
        writer.write_tensor_data(data)
    writer.close()
    os.replace(tmp, dst)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--digest":
        print(tensor_digest(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[3] in QTYPES:
        derive(*sys.argv[1:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
