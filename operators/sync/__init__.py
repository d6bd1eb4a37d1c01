"""The sync step of the daily pipeline: batch outputs into the online store (DynamoDB, :mod:`.dynamodb`)
and the warehouse. Item building and the retry/rate arithmetic are pure (:mod:`.items`); per-file
checkpoints in the lake make every sync resumable (:mod:`.checkpoint`). See docs/sync.md."""
