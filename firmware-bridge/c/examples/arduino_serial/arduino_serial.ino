// An Arduino (Uno, Nano, ...) on a Pi's USB serial port as device `uno`:
// emits `temp` every 10 s, subscribes to `led.*` events and lights pin 13
// on `led.on`. Register it on the node it is plugged into:
//   covey device add uno
// and start that node with `bridge_serial: ["/dev/ttyACM0@115200"]`.
// The node opening the port resets the board; the library says hello again
// by itself, as it does after any reset of either side.
#include <covey_device.h>

#define DEVICE_KEY "paste the 64 hex digits printed by covey device add"

static covey_device dev;

static int ser_write(void *, const uint8_t *buf, size_t len) {
  Serial.write(buf, len);
  return 0;
}

static int ser_read(void *, uint8_t *buf, size_t cap) {
  int n = 0;
  while (n < (int)cap && Serial.available() > 0) buf[n++] = (uint8_t)Serial.read();
  return n;
}

static uint32_t now_ms(void *) { return millis(); }

// No hardware RNG on an AVR: mix the noise of a floating analog pin with
// the microsecond clock. Only the hello's nonce comes from here.
static void noise_random(void *, uint8_t *buf, size_t len) {
  for (size_t i = 0; i < len; i++) buf[i] = (uint8_t)(analogRead(A5) ^ (micros() >> 2) ^ (i * 151));
}

static void on_event(void *, const char *, const char *name, const uint8_t *, size_t) {
  if (strcmp(name, "led.on") == 0) digitalWrite(13, HIGH);
  if (strcmp(name, "led.off") == 0) digitalWrite(13, LOW);
}

void setup() {
  pinMode(13, OUTPUT);
  Serial.begin(115200);
  uint8_t key[COVEY_KEY_LEN];
  covey_key_from_hex(key, DEVICE_KEY);
  covey_transport t = {ser_write, ser_read, now_ms, noise_random, nullptr, 1};
  covey_init(&dev, &t, "uno", key);
  covey_on_event(&dev, on_event);
  covey_subscribe(&dev, "*", "led.*");
}

void loop() {
  static uint32_t last;
  covey_poll(&dev);
  if (millis() - last > 10000 && covey_connected(&dev)) {
    char text[16];
    int n = snprintf(text, sizeof text, "%d", analogRead(A0));
    if (covey_emit(&dev, "temp", (const uint8_t *)text, (size_t)n, 0) == COVEY_OK) last = millis();
  }
}
