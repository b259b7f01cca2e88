"""Features from raw conversations (extract.py): reading a manifest or a MELD / IEMOCAP release into utterances,
decoding their audio and video, the text, audio and visual extractors, the extraction record that travels with
the features, and the resumable shards an extraction writes while it works."""
