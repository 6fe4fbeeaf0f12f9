bool high_round_trip();

int main() { return high_round_trip() ? 0 : 1; }
