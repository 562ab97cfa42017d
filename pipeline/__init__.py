"""pipeline: the dataset job (input shards -> annotate -> output shards), on Ray and fsspec"""
