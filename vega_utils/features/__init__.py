"""Features from raw conversations (extract.py): reading a manifest, a MELD / IEMOCAP release or recordings with
their transcripts (or with cues made by speech recognition) into utterances, decoding their audio and video, the
text, audio and visual extractors (the text encoder fine-tuned first, with --text_finetune), the extraction record
that travels with the features and its replay (on new conversations, or on a recording for a checkpoint), the
resumable shards an extraction writes while it works, and the checks made before any work: where the output goes
(never over a finished extraction) and where each model comes from (a folder, the local cache, or the hub)."""
