"""The streamrec controller: the daily PipelineRun (stages, executors), sync to DynamoDB and the warehouse, promotion."""
