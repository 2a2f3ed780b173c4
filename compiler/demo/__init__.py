"""The demo's parts: its labelled data (VADER) and the fine-tuning that makes the model it
compiles."""
