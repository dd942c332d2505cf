"""The data room: document sources, tokenizers and the grain pipeline that packs them into batches."""
