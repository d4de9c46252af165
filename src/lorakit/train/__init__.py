"""Fine-tuning on top of the lorakit core: data preparation (``data``)."""
