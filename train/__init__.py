"""train: the ControlNet trainer, reading the dataset job's output shards"""
