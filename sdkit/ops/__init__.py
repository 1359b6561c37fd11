"""Operations on model files: pure, tensor by tensor, from lazy inputs to a lazy output."""
